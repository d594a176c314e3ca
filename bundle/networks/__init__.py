"""Networks: the dual-network method's two subnets and inference wrappers (:mod:`bundle.networks.subnets`) and the
peer methods' V-Net variants (:mod:`bundle.networks.peer`)."""
