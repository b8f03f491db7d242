"""The pruning pipeline, in reading order:

``data`` (corpora -> token batches) -> ``calibration`` (+ ``taps``, ``distributed``; statistics in
``stats``) -> ``importance`` (scores) -> ``policy`` / ``planning`` (plans; ``budget`` sizes one by
held-out quality) -> ``compensate`` / ``sequential`` (refits) -> ``compact`` (gather, save;
``sharded`` out of core) -> ``evaluation``. ``vocab`` / ``vocab_size`` prune the vocabulary, ``moe``
the experts of mixture-of-experts models; ``prune`` runs the whole pipeline in one call.
"""
