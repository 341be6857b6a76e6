"""sbi-engine: simulation-based inference and systematics-robust training on JAX.

The public API is re-exported here; internal modules are free to move.
"""

from sbi_engine.errors import (
    ConfigError,
    DatasetError,
    SbiEngineError,
    ShapeError,
    UnknownSimulatorError,
)
from sbi_engine.priors import (
    BoxUniform,
    Gaussian,
    LogUniform,
    Prior,
    ProductPrior,
    TruncatedGaussian,
    prior_from_dict,
    prior_from_parameters,
)
from sbi_engine.simulator import (
    BlackBoxSimulator,
    JaxSimulator,
    Parameter,
    SimulationReport,
    Simulator,
    get_simulator,
    list_simulators,
    register_simulator,
)

__version__ = "0.1.0"

__all__ = [
    "BlackBoxSimulator",
    "BoxUniform",
    "ConfigError",
    "DatasetError",
    "Gaussian",
    "JaxSimulator",
    "LogUniform",
    "Parameter",
    "Prior",
    "ProductPrior",
    "SbiEngineError",
    "ShapeError",
    "SimulationReport",
    "Simulator",
    "TruncatedGaussian",
    "UnknownSimulatorError",
    "__version__",
    "get_simulator",
    "list_simulators",
    "prior_from_dict",
    "prior_from_parameters",
    "register_simulator",
]
