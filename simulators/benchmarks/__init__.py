"""sbibm benchmark tasks (Lueckmann et al. 2021, "Benchmarking Simulation-Based
Inference", AISTATS) as torch-free JAX simulators.

One module per task, each with ``build() -> JaxSimulator`` (registered under the task
name through the ``sbi_engine.simulators`` entry points) and the accessors
``observation(num)``, ``true_parameters(num)``, ``reference_posterior_samples(num)``
for the ten sbibm observations (see :mod:`simulators.benchmarks.reference`).
"""

TASKS = ("two_moons", "gaussian_linear", "gaussian_linear_uniform", "gaussian_mixture",
         "slcp", "bernoulli_glm")

__all__ = ["TASKS"]
