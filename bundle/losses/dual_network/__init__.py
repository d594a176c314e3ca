"""The dual-network method's loss terms (docs/methods/dual_network.md), a package because its seven terms fill four
modules: :mod:`.reliability` (entropy-percentile masks and union pseudo-labels), :mod:`.pseudo` (CPS, EFS, UE),
:mod:`.prototype` (PGL) and :mod:`.consistency` (CR, cosine). Its supervised term is the shared
:class:`~bundle.losses.supervised.SupervisedLoss`."""
