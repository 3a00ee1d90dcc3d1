"""The training job: a short loop (``trainer``) over stateful components, checkpointed by ``checkpoint``.

Nothing is imported here, so that ``miss_ds.train.preemption`` (the first import of launch/train.py, whose signal
handler must be in place within milliseconds) does not pull in torch.
"""
