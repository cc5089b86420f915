"""micrec_tf/evaluation."""
