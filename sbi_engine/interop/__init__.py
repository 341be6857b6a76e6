"""Bridges to other SBI toolkits.

- :mod:`sbi_engine.interop.sbi` — the `sbi <https://sbi-dev.github.io/sbi/>`_ (PyTorch)
  backend: prior conversion (:func:`~sbi_engine.interop.sbi.to_sbi_prior`), NPE training
  with sbi's own trainer (:func:`~sbi_engine.interop.sbi.train_sbi`) and
  :class:`~sbi_engine.interop.sbi.SbiPosterior`, which offers the same interface as
  :class:`sbi_engine.posterior.Posterior`.

The backend needs the optional ``[sbi]`` extra (torch + sbi), so it is not imported
here: ``from sbi_engine.interop.sbi import train_sbi``.
"""

from __future__ import annotations

__all__: list[str] = []
