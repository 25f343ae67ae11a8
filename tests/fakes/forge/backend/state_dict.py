"""Fake of backend/state_dict.py: non-strict loads that only report, and prefix filtering.

transformers ≥ 5.6 has no ``text_model.`` level in ``CLIPTextModel``; keys are matched to the
module's own spelling so the same checkpoint files load under both transformers lines.
"""


def _respell(model, sd):
    if any(".text_model." in k or k.startswith("text_model.") for k in model.state_dict()):
        return dict(sd)
    return {k.replace("text_model.", "", 1): v for k, v in sd.items()}


def load_state_dict(model, sd, ignore_errors=(), log_name=None, ignore_start=None):
    sd = _respell(model, sd)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [x for x in missing if x not in ignore_errors and x.replace(".text_model.", ".", 1) not in ignore_errors]
    unexpected = [x for x in unexpected if x not in ignore_errors]
    return missing, unexpected


def try_filter_state_dict(sd, prefix_list, new_prefix=""):
    for prefix in prefix_list:
        if any(k.startswith(prefix) for k in sd):
            return {new_prefix + k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return {}
