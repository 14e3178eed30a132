"""JAX training: the LDM losses as pure functions, LPIPS-VGG, the PatchGAN discriminator, and an optax trainer."""
