"""Layer 5, one run in one output folder: building teacher and student (`build`), the shared run skeleton
(`runner.Run`), its extension points (`hooks`), the initial quantizer ranges (`initial_ranges`), checkpoint state and
resume (`runstate`, `resume`), the image stream, the distillation loop (`trainer.Trainer`, `step_graph`), PTQ
(`ptq`), delivery (`deliver`: summary, export, parity, lint) and the report; `artifacts` scores any model file."""
