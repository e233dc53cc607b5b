from prometheus_client import CollectorRegistry, Histogram, generate_latest

from asyncrl.metrics import observe_many


def test_observe_many_equals_that_many_observations():
    regs = [CollectorRegistry(), CollectorRegistry()]
    one, many = (Histogram("h", "h", buckets=(0, 1, 2, 4), registry=r) for r in regs)
    for lag, n in ((0, 3), (2, 500), (7, 2), (1, 0)):
        for _ in range(n):
            one.observe(lag)
        observe_many(many, lag, n)
    one_text, many_text = (
        [x for x in generate_latest(r).decode().splitlines() if "_created" not in x]
        for r in regs)
    assert one_text == many_text
    assert 'h_bucket{le="2.0"} 503.0' in many_text and 'h_sum 1014.0' in many_text
