"""The seed's `layer_summary` printouts (D2L 7.6, 8.2, 8.6), shared by the tests."""

# The seed's three printouts (D2L 7.6, 8.2, 8.6), as `print(name, 'output shape:\t', X.shape)`
# writes them: the name, a space, "output shape:", a tab, a space, the torch.Size.
LENET_28 = """\
Conv2d output shape:\t torch.Size([1, 6, 28, 28])
Sigmoid output shape:\t torch.Size([1, 6, 28, 28])
AvgPool2d output shape:\t torch.Size([1, 6, 14, 14])
Conv2d output shape:\t torch.Size([1, 16, 10, 10])
Sigmoid output shape:\t torch.Size([1, 16, 10, 10])
AvgPool2d output shape:\t torch.Size([1, 16, 5, 5])
Flatten output shape:\t torch.Size([1, 400])
Linear output shape:\t torch.Size([1, 120])
Sigmoid output shape:\t torch.Size([1, 120])
Linear output shape:\t torch.Size([1, 84])
Sigmoid output shape:\t torch.Size([1, 84])
Linear output shape:\t torch.Size([1, 10])"""

VGG11_224 = """\
Sequential output shape:\t torch.Size([1, 64, 112, 112])
Sequential output shape:\t torch.Size([1, 128, 56, 56])
Sequential output shape:\t torch.Size([1, 256, 28, 28])
Sequential output shape:\t torch.Size([1, 512, 14, 14])
Sequential output shape:\t torch.Size([1, 512, 7, 7])
Flatten output shape:\t torch.Size([1, 25088])
Linear output shape:\t torch.Size([1, 4096])
ReLU output shape:\t torch.Size([1, 4096])
Dropout output shape:\t torch.Size([1, 4096])
Linear output shape:\t torch.Size([1, 4096])
ReLU output shape:\t torch.Size([1, 4096])
Dropout output shape:\t torch.Size([1, 4096])
Linear output shape:\t torch.Size([1, 10])"""

RESNET18_96 = """\
Sequential output shape:\t torch.Size([1, 64, 24, 24])
Sequential output shape:\t torch.Size([1, 64, 24, 24])
Sequential output shape:\t torch.Size([1, 128, 12, 12])
Sequential output shape:\t torch.Size([1, 256, 6, 6])
Sequential output shape:\t torch.Size([1, 512, 3, 3])
Sequential output shape:\t torch.Size([1, 10])"""
