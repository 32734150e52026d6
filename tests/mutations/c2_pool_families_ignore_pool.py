"""(c) The digits-pool families (CNN, autoencoder) loading the meta-training pool whatever their ``pool`` says."""
MUTATION = dict(
    file="learned_opt/tasks/vision.py",
    old="data = _pool_data(self.pool, self.split_seed, self.dtype, self.device, autoencode=autoencode)",
    new='data = _pool_data("meta", self.split_seed, self.dtype, self.device, autoencode=autoencode)',
    caught_by="tests/test_guards_protocol.py::test_heldout_suite_families_hold_no_meta_training_image",
)
