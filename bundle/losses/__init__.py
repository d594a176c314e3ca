"""Loss terms of every method, one ``nn.Module`` per term (see each class for its equation).

The rule: **a term lives in the module of the method family that uses it; a piece that two families use lives once
in a shared module named for what it is.**

* Family modules, named after the method module in :mod:`bundle.methods`: :mod:`.baselines` (Mean Teacher, UA-MT,
  CPS, BCP, the supervised V-Net), :mod:`.ducisc`, :mod:`.dycon`, and :mod:`.dual_network` (a package: its seven
  terms fill four modules).
* Shared modules: :mod:`.functional` (label check, one-hot, class arg-max, ``softmax_entropy``, masked
  cross-entropy, soft Dice: each once, with the constants that differ between the released codes as arguments),
  :mod:`.supervised` (the CE + Dice supervised loss of the dual-network method and DyCON) and :mod:`.ramps` (weight
  ramps and schedules).

Losses are stateless functions of their inputs: state that a term updates across iterations (DuCiSC's thresholds,
BCP's stage) and input transforms (teacher noise, mixup) belong to the method (:mod:`bundle.methods`), whose
``state_dict()`` holds them. A new method's terms go into ``bundle/losses/<method>.py``; a piece it shares with an
existing family moves into a shared module. Import a term from the module that defines it (this package re-exports
nothing).
"""
