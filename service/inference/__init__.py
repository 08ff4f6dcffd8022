"""The inference pipeline: decode, preprocess, batch, forward and encode, for every protocol."""
