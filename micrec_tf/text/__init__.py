"""micrec_tf/text."""
