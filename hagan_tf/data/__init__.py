"""Training data: the TFRecord schema, the tf.data input pipeline and a synthetic dataset."""
