"""The rest of the book's chapter 8 (D2L 8.1, 8.3-8.5, 8.7, 8.8), as its own code prints it.

Each value was produced by running the book's PyTorch code (d2l 1.0.3: lazy layers, the
`layer_summary` loop `print(layer.__class__.__name__, 'output shape:\\t', X.shape)`, in eval
mode) at the section's shape; cnnserve's networks are its own code, and these pin them to the
book's. `layout` is the sha256 of the book's materialised `state_dict` written one
`key (shape)` line per tensor, in order: equal digests mean a state dict of one loads into
the other.
"""

# 8.1 `AlexNet().layer_summary((1, 1, 224, 224))`
ALEXNET_224 = """\
Conv2d output shape:\t torch.Size([1, 96, 54, 54])
ReLU output shape:\t torch.Size([1, 96, 54, 54])
MaxPool2d output shape:\t torch.Size([1, 96, 26, 26])
Conv2d output shape:\t torch.Size([1, 256, 26, 26])
ReLU output shape:\t torch.Size([1, 256, 26, 26])
MaxPool2d output shape:\t torch.Size([1, 256, 12, 12])
Conv2d output shape:\t torch.Size([1, 384, 12, 12])
ReLU output shape:\t torch.Size([1, 384, 12, 12])
Conv2d output shape:\t torch.Size([1, 384, 12, 12])
ReLU output shape:\t torch.Size([1, 384, 12, 12])
Conv2d output shape:\t torch.Size([1, 256, 12, 12])
ReLU output shape:\t torch.Size([1, 256, 12, 12])
MaxPool2d output shape:\t torch.Size([1, 256, 5, 5])
Flatten output shape:\t torch.Size([1, 6400])
Linear output shape:\t torch.Size([1, 4096])
ReLU output shape:\t torch.Size([1, 4096])
Dropout output shape:\t torch.Size([1, 4096])
Linear output shape:\t torch.Size([1, 4096])
ReLU output shape:\t torch.Size([1, 4096])
Dropout output shape:\t torch.Size([1, 4096])
Linear output shape:\t torch.Size([1, 10])"""

# 8.3 `NiN().layer_summary((1, 1, 224, 224))`
NIN_224 = """\
Sequential output shape:\t torch.Size([1, 96, 54, 54])
MaxPool2d output shape:\t torch.Size([1, 96, 26, 26])
Sequential output shape:\t torch.Size([1, 256, 26, 26])
MaxPool2d output shape:\t torch.Size([1, 256, 12, 12])
Sequential output shape:\t torch.Size([1, 384, 12, 12])
MaxPool2d output shape:\t torch.Size([1, 384, 5, 5])
Dropout output shape:\t torch.Size([1, 384, 5, 5])
Sequential output shape:\t torch.Size([1, 10, 5, 5])
AdaptiveAvgPool2d output shape:\t torch.Size([1, 10, 1, 1])
Flatten output shape:\t torch.Size([1, 10])"""

# 8.4 `GoogleNet().layer_summary((1, 1, 96, 96))`
GOOGLENET_96 = """\
Sequential output shape:\t torch.Size([1, 64, 24, 24])
Sequential output shape:\t torch.Size([1, 192, 12, 12])
Sequential output shape:\t torch.Size([1, 480, 6, 6])
Sequential output shape:\t torch.Size([1, 832, 3, 3])
Sequential output shape:\t torch.Size([1, 1024])
Linear output shape:\t torch.Size([1, 10])"""

# 8.5 `BNLeNet().layer_summary((1, 1, 28, 28))`
BN_LENET_28 = """\
Conv2d output shape:\t torch.Size([1, 6, 24, 24])
BatchNorm2d output shape:\t torch.Size([1, 6, 24, 24])
Sigmoid output shape:\t torch.Size([1, 6, 24, 24])
AvgPool2d output shape:\t torch.Size([1, 6, 12, 12])
Conv2d output shape:\t torch.Size([1, 16, 8, 8])
BatchNorm2d output shape:\t torch.Size([1, 16, 8, 8])
Sigmoid output shape:\t torch.Size([1, 16, 8, 8])
AvgPool2d output shape:\t torch.Size([1, 16, 4, 4])
Flatten output shape:\t torch.Size([1, 256])
Linear output shape:\t torch.Size([1, 120])
BatchNorm1d output shape:\t torch.Size([1, 120])
Sigmoid output shape:\t torch.Size([1, 120])
Linear output shape:\t torch.Size([1, 84])
BatchNorm1d output shape:\t torch.Size([1, 84])
Sigmoid output shape:\t torch.Size([1, 84])
Linear output shape:\t torch.Size([1, 10])"""

# 8.7 `DenseNet().layer_summary((1, 1, 96, 96))`
DENSENET_96 = """\
Sequential output shape:\t torch.Size([1, 64, 24, 24])
DenseBlock output shape:\t torch.Size([1, 192, 24, 24])
Sequential output shape:\t torch.Size([1, 96, 12, 12])
DenseBlock output shape:\t torch.Size([1, 224, 12, 12])
Sequential output shape:\t torch.Size([1, 112, 6, 6])
DenseBlock output shape:\t torch.Size([1, 240, 6, 6])
Sequential output shape:\t torch.Size([1, 120, 3, 3])
DenseBlock output shape:\t torch.Size([1, 248, 3, 3])
Sequential output shape:\t torch.Size([1, 10])"""

# 8.8 `RegNetX32().layer_summary((1, 1, 96, 96))`
REGNETX32_96 = """\
Sequential output shape:\t torch.Size([1, 32, 48, 48])
Sequential output shape:\t torch.Size([1, 32, 24, 24])
Sequential output shape:\t torch.Size([1, 80, 12, 12])
Sequential output shape:\t torch.Size([1, 10])"""

#: Parameters of each top-level layer (the rows of the printout), their total, and the
#: state_dict layout digest, at the shapes above.
BOOK_NUMBERS: dict[str, dict[str, object]] = {
    "alexnet": {
        "params": 46764746,
        "rows": [
            11712,
            0,
            0,
            614656,
            0,
            0,
            885120,
            0,
            1327488,
            0,
            884992,
            0,
            0,
            0,
            26218496,
            0,
            0,
            16781312,
            0,
            0,
            40970,
        ],
        "tensors": 16,
        "layout": "87ab710fcb5288a547d5c75d56480cb11a41642b0bf29caff357724f296edec4",
    },
    "nin": {
        "params": 1992166,
        "rows": [30336, 0, 746240, 0, 1180800, 0, 0, 34790, 0, 0],
        "tensors": 24,
        "layout": "e55feeb057a86b70ed70052bc4575276a70154c340702bd0ac895761fe173f37",
    },
    "googlenet": {
        "params": 5977530,
        "rows": [3200, 114944, 552432, 2809168, 2487536, 10250],
        "tensors": 116,
        "layout": "5514a13d9b5d81bb4351ba6fabd03b5523cf95a7e95c1498e702f315b53b35bc",
    },
    "bn_lenet": {
        "params": 44878,
        "rows": [156, 12, 0, 0, 2416, 32, 0, 0, 0, 30840, 240, 0, 10164, 168, 0, 850],
        "tensors": 30,
        "layout": "cbee8ab8027fcd2fc004ed5aee6e2ad76fc92b89ead1dd3e1cc674f18dc29790",
    },
    "densenet": {
        "params": 758226,
        "rows": [3328, 130048, 18912, 167168, 25648, 185728, 29400, 195008, 2986],
        "tensors": 147,
        "layout": "66ba35307e88eed97a38670fdf1604708338db0f38eb9d296f500c0a0785f575",
    },
    "regnetx32": {
        "params": 179290,
        "rows": [384, 28896, 149200, 810],
        "tensors": 233,
        "layout": "3995bfa8400d35a78ca1e0ac00883eb61a9cd56bf4ae13867699f906acda7fff",
    },
}
