import numpy as np
from prometheus_client import CollectorRegistry, Histogram

from enricher.metrics import observe_many


def test_bulk_observe_equals_one_observe_per_value():
    values = np.random.default_rng(1).exponential(0.3, size=5000)
    values[:3] = [0.0, 0.5, 1e9]  # on a bound, and past the last bucket
    one, bulk = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("h", "h", buckets=(0.1, 0.5, 1, 5), registry=one)
    h2 = Histogram("h", "h", buckets=(0.1, 0.5, 1, 5), registry=bulk)
    for v in values:
        h1.observe(v)
    observe_many(h2, values)
    samples = lambda r: {(s.name, tuple(s.labels.items())): s.value for m in r.collect() for s in m.samples
                         if not s.name.endswith("_created")}
    a, b = samples(one), samples(bulk)
    assert a.keys() == b.keys()
    for k in a:
        assert np.isclose(a[k], b[k]), k
