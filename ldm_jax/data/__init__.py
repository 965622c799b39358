"""Training data: tf.data input pipelines (pipeline.py), the built-in ldm_shapes TFDS dataset and its tokenizer
(shapes.py), and the data config section (config.py). Importing this package or config.py imports no TensorFlow.
"""
