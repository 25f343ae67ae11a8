"""Fake of the ComfyUI-derived back end the ldm_patched Forges (reForge, Forge Classic) ship."""
