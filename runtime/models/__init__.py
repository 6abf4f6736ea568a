"""Own torch implementations of the SD3.5 MMDiT and VAE decoder (diffusers parameter names)."""
