"""Speed benchmarks: `python -m bench.train_speed`, `bench.sample_speed`,
`bench.data_speed`. They print figures; no test times anything. See docs/benchmarks.md."""
