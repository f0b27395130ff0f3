"""One trainer process, several adapters: each adapter's trainer keeps its own metrics
registry, and the process exports them all, each sample labelled with its adapter.

Every trainer records into its own ``TrainerMetrics`` (no label for the adapter in the
code that records); :class:`AdapterLabelled` is the one collector the process serves. It
merges the families of every adapter's registry by name and adds ``adapter="<name>"`` to
each sample, so ``reef_trainer_steps_total{adapter="reef-acme"}`` and the alert rules'
one-to-one matches (buffer against batch size, per adapter) work as for one adapter.
Adapters are the configured tenants' adapters: a small, fixed label set.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector


class AdapterLabelled(Collector):
    """The metrics of several registries, by adapter, as one set of families."""

    def __init__(self, registries: Mapping[str, CollectorRegistry]) -> None:
        self._registries = dict(registries)

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for adapter, registry in self._registries.items():
            for family in registry.collect():
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(family.name, family.documentation,
                                                        family.type, family.unit)
                for sample in family.samples:
                    into.add_sample(sample.name, {**sample.labels, "adapter": adapter},
                                    sample.value, sample.timestamp, sample.exemplar)
        return list(merged.values())


def combined_registry(registries: Mapping[str, CollectorRegistry]) -> CollectorRegistry:
    """A registry serving every adapter's metrics, labelled by adapter."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AdapterLabelled(registries))
    return registry
