"""micrec_tf/data."""
