"""Fake of modules/sysinfo.py ``set_config`` (Forge): how ``p.override_settings`` reach ``opts``."""


def set_config(req, is_api=False, run_callbacks=True, save_config=True):
    from modules import shared
    from modules_forge import main_entry

    refresh = False
    for k, v in req.items():
        if v == shared.opts.data.get(k):
            continue
        if k == "sd_model_checkpoint":
            refresh |= main_entry.checkpoint_change(v, save=False, refresh=False)
        elif k == "forge_additional_modules":
            refresh |= main_entry.modules_change(v, save=False, refresh=False)
        else:
            shared.opts.set(k, v, is_api=is_api, run_callbacks=run_callbacks)
    if refresh:
        main_entry.refresh_model_loading_parameters()
