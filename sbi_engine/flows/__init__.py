"""Conditional normalizing flows for neural posterior estimation (NPE).

Masked autoregressive flows (Papamakarios et al. 2017) and neural spline flows
(Durkan et al. 2019), coupling and autoregressive, conditioned on ``x`` through an
optional embedding network, with standardisation and prior bijections built in.
Hyperparameter defaults match sbi 0.27's ``posterior_nn``.

    >>> flow = build_flow(FlowConfig(kind="nsf"), theta_dim=2, x_shape=3)
    >>> params = flow.init(jax.random.key(0))
    >>> flow.log_prob(params, theta, x)          # (n, 2), (n, 3) -> (n,)
    >>> flow.sample(params, key, x_o, 1000)     # (3,) -> (1000, 2)
"""

from sbi_engine.flows.base import FLOW_KINDS, Block, FlowConfig, embedding_from_dict
from sbi_engine.flows.conditional import (
    FLOWS,
    ConditionalFlow,
    build_flow,
    build_flow_from_data,
)
from sbi_engine.flows.embedding import CNNEmbedding, EmbeddingConfig, MLPEmbedding
from sbi_engine.flows.spline import rational_quadratic_spline
from sbi_engine.flows.standardize import Standardization, fit_zscore

__all__ = [
    "FLOWS",
    "FLOW_KINDS",
    "Block",
    "CNNEmbedding",
    "ConditionalFlow",
    "EmbeddingConfig",
    "FlowConfig",
    "MLPEmbedding",
    "Standardization",
    "build_flow",
    "build_flow_from_data",
    "embedding_from_dict",
    "fit_zscore",
    "rational_quadratic_spline",
]
