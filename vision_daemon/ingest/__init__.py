"""Ways frames arrive: one module per transport, each feeding the pipeline with a sink."""
