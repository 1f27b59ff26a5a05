"""``python -m lavis.config.migrate`` (the documented command) runs :mod:`lavis.predecessors.migrate`, by module name
so that config, the lowest layer, imports nothing above it."""
import runpy

runpy.run_module("lavis.predecessors.migrate", run_name="__main__", alter_sys=True)
