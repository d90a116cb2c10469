"""``torch.library`` registrations (custom ops, fake implementations, autograd) of gmwae_fast's op families."""
