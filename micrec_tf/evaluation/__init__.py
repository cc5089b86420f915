"""micrec_tf/evaluation: HIT@N and item coverage (paper 5.4, 5.6.2), baselines, test-split loading.

Importing this package does not import TensorFlow or ScaNN; they are loaded when first needed.
"""
from micrec_tf.search import CSRExclusion, as_exclusion
from micrec_tf.evaluation.baselines import (KNN_VARIANTS, CooccurrenceItemKNN, MostPopular,
                                            choose_variant)
from micrec_tf.evaluation.data import (EarlierClicksExclusion, earlier_clicks_exclusion,
                                       load_cooccurrence, load_feature_spec, load_split_arrays,
                                       num_items, train_item_counts)
from micrec_tf.evaluation.metrics import (evaluate_retrieval,
                                          hit_at_n, hit_at_n_on_slice, item_coverage,
                                          long_tail_items, summarize_topk, top_k_by_score_fn,
                                          top_k_from_scores, top_k_items, top_k_items_scann)

__all__ = [
    "CooccurrenceItemKNN", "KNN_VARIANTS", "MostPopular", "choose_variant",
    "EarlierClicksExclusion", "earlier_clicks_exclusion",
    "load_cooccurrence", "load_feature_spec", "load_split_arrays", "num_items",
    "train_item_counts", "CSRExclusion", "as_exclusion", "evaluate_retrieval", "hit_at_n",
    "hit_at_n_on_slice", "item_coverage", "long_tail_items", "summarize_topk",
    "top_k_by_score_fn", "top_k_from_scores", "top_k_items", "top_k_items_scann",
]
