"""sbibm benchmark tasks (Lueckmann et al. 2021) as JAX simulators."""
