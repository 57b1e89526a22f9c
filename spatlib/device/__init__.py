"""The device tools: what a machine is and how much memory a block takes (:mod:`.machine`),
``spat doctor`` (:mod:`.doctor`: prove the training path on this device) and ``spat bench``
(:mod:`.bench`: throughput, overheads, memory; the configurations it times in :mod:`.slices`).

Nothing is imported here, so that ``spat --help`` and ``python -m spatlib.device.slices``
load only what they use.
"""
