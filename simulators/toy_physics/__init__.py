"""Physics toys with nuisance parameters: signal/background event generators.

One module per toy, each a final :class:`~sbi_engine.events.EventGenerator` with a
``build(**options)`` factory:

- :mod:`~simulators.toy_physics.inferno` — the INFERNO 3-D problem (de Castro &
  Dorigo 2019, arXiv:1806.04743);
- :mod:`~simulators.toy_physics.pivot` — the Learning-to-Pivot 2-D toy (Louppe, Kagan
  & Cranmer 2017, arXiv:1611.01046);
- :mod:`~simulators.toy_physics.higgs_like` — a synthetic HiggsML-like H→ττ problem
  with the FAIR-Universe nuisances.

:data:`GENERATORS` maps names to factories (the same names the
``sbi_engine.event_generators`` entry points use).
"""

from simulators.toy_physics import higgs_like, inferno, pivot

GENERATORS = {
    inferno.NAME: inferno.build,
    pivot.NAME: pivot.build,
    higgs_like.NAME: higgs_like.build,
}

__all__ = ["GENERATORS"]
