"""Wire encoders: physical values in, frame bytes and the values as quantised out."""
