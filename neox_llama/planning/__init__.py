"""Planning before and around a run: the launch plan and command (``launch``), the checks before any rank starts
(``preflight``), parameter and FLOPs counts (``flops``), the per-rank memory estimate (``memory``) and the dry run's
report (``report``). Torch is used only to build a model on the meta device for counting."""
