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
from sbi_engine.events import (
    EventData,
    EventGenerator,
    Process,
    get_generator,
    list_generators,
    make_dataset,
    register_generator,
)
from sbi_engine.experiment import (
    ExperimentConfig,
    ExperimentType,
    register_experiment_type,
    run_point,
    run_sweep,
)
from sbi_engine.flows import CNNEmbedding, FlowConfig, MLPEmbedding
from sbi_engine.npe import NPEConfig, TrainResult, train_npe, train_tsnpe
from sbi_engine.posterior import Posterior, load_posterior
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
from sbi_engine.restriction import (
    ClassifierConfig,
    RestrictedPrior,
    ValidityClassifier,
    train_validity_classifier,
)
from sbi_engine.simulate import SimulationResult, simulate
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
from sbi_engine.store import Dataset, load_dataset

__version__ = "0.1.0"

__all__ = [
    "BlackBoxSimulator",
    "BoxUniform",
    "CNNEmbedding",
    "ClassifierConfig",
    "ConfigError",
    "Dataset",
    "DatasetError",
    "EventData",
    "EventGenerator",
    "ExperimentConfig",
    "ExperimentType",
    "FlowConfig",
    "Gaussian",
    "JaxSimulator",
    "LogUniform",
    "MLPEmbedding",
    "NPEConfig",
    "Parameter",
    "Posterior",
    "Prior",
    "Process",
    "ProductPrior",
    "RestrictedPrior",
    "SbiEngineError",
    "ShapeError",
    "SimulationReport",
    "SimulationResult",
    "Simulator",
    "TrainResult",
    "TruncatedGaussian",
    "UnknownSimulatorError",
    "ValidityClassifier",
    "__version__",
    "get_generator",
    "get_simulator",
    "list_generators",
    "list_simulators",
    "load_dataset",
    "load_posterior",
    "make_dataset",
    "prior_from_dict",
    "prior_from_parameters",
    "register_experiment_type",
    "register_generator",
    "register_simulator",
    "run_point",
    "run_sweep",
    "simulate",
    "train_npe",
    "train_tsnpe",
    "train_validity_classifier",
]
