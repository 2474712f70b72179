"""The floor: writes that never leave a torn file, and rank facts with errors every rank raises together.

May import: nothing of ds_aslora (torch and the standard library only).
"""
