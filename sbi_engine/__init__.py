"""sbi-engine: simulation-based inference and systematics-robust training on JAX.

The public API is re-exported here; internal modules are free to move. The exports
are imported on first use (PEP 562), so ``import sbi_engine`` (and a worker process
that only needs :mod:`sbi_engine.errors`) does not pay for JAX and flax until needed.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
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
    from sbi_engine.npe import CheckpointError, NPEConfig, TrainResult, train_npe, train_tsnpe
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

_EXPORTS = {
    "CheckpointError": "sbi_engine.npe",
    "BlackBoxSimulator": "sbi_engine.simulator",
    "BoxUniform": "sbi_engine.priors",
    "CNNEmbedding": "sbi_engine.flows",
    "ClassifierConfig": "sbi_engine.restriction",
    "ConfigError": "sbi_engine.errors",
    "Dataset": "sbi_engine.store",
    "DatasetError": "sbi_engine.errors",
    "EventData": "sbi_engine.events",
    "EventGenerator": "sbi_engine.events",
    "ExperimentConfig": "sbi_engine.experiment",
    "ExperimentType": "sbi_engine.experiment",
    "FlowConfig": "sbi_engine.flows",
    "Gaussian": "sbi_engine.priors",
    "JaxSimulator": "sbi_engine.simulator",
    "LogUniform": "sbi_engine.priors",
    "MLPEmbedding": "sbi_engine.flows",
    "NPEConfig": "sbi_engine.npe",
    "Parameter": "sbi_engine.simulator",
    "Posterior": "sbi_engine.posterior",
    "Prior": "sbi_engine.priors",
    "Process": "sbi_engine.events",
    "ProductPrior": "sbi_engine.priors",
    "RestrictedPrior": "sbi_engine.restriction",
    "SbiEngineError": "sbi_engine.errors",
    "ShapeError": "sbi_engine.errors",
    "SimulationReport": "sbi_engine.simulator",
    "SimulationResult": "sbi_engine.simulate",
    "Simulator": "sbi_engine.simulator",
    "TrainResult": "sbi_engine.npe",
    "TruncatedGaussian": "sbi_engine.priors",
    "UnknownSimulatorError": "sbi_engine.errors",
    "ValidityClassifier": "sbi_engine.restriction",
    "get_generator": "sbi_engine.events",
    "get_simulator": "sbi_engine.simulator",
    "list_generators": "sbi_engine.events",
    "list_simulators": "sbi_engine.simulator",
    "load_dataset": "sbi_engine.store",
    "load_posterior": "sbi_engine.posterior",
    "make_dataset": "sbi_engine.events",
    "prior_from_dict": "sbi_engine.priors",
    "prior_from_parameters": "sbi_engine.priors",
    "register_experiment_type": "sbi_engine.experiment",
    "register_generator": "sbi_engine.events",
    "register_simulator": "sbi_engine.simulator",
    "run_point": "sbi_engine.experiment",
    "run_sweep": "sbi_engine.experiment",
    "simulate": "sbi_engine.simulate",
    "train_npe": "sbi_engine.npe",
    "train_tsnpe": "sbi_engine.npe",
    "train_validity_classifier": "sbi_engine.restriction",
}

__version__ = "0.1.0"

__all__ = [
    "BlackBoxSimulator",
    "BoxUniform",
    "CNNEmbedding",
    "CheckpointError",
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


class _Package(types.ModuleType):
    """Keeps an exported function when its same-named submodule is imported.

    Importing ``sbi_engine.simulate`` sets the package attribute ``simulate`` to the
    submodule; with eager imports the later ``from sbi_engine.simulate import simulate``
    rebound it to the function, and this keeps that behaviour for lazy exports.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sbi_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
