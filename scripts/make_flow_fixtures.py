"""Reference noise levels of diffusers' FlowMatchEulerDiscreteScheduler for tests/test_flow.py.

    /path/to/torch-env/bin/python scripts/make_flow_fixtures.py   # writes tests/fixtures/flow_sigmas.json
"""
import json
import pathlib

from diffusers import FlowMatchEulerDiscreteScheduler

out = {}
for shift in (1.0, 3.0, 5.0):
    for steps in (1, 4, 25, 50):
        s = FlowMatchEulerDiscreteScheduler(shift=shift)
        s.set_timesteps(steps)
        out[f"{shift}_{steps}"] = [float(x) for x in s.sigmas.numpy()]
path = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "flow_sigmas.json"
path.write_text(json.dumps(out, indent=1))
print("wrote", path)
