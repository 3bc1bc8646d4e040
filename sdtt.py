"""
The Python API of the original SDTT release (github.com/jdeschena/sdtt), under its own module name, so that the
release README's snippets run verbatim from the repository root:

    from sdtt import load_small_student
    model = load_small_student(loss="kld", round=7)
    tokens = model.sample(n_samples=8, num_steps=256, seq_len=1024)   # all-MASK prior, as the release

Only re-exports: the loaders and the model wrapper live in sample.py.
"""
from sample import DiffusionLM, load_mdlm_small, load_scaling_student, load_scaling_teacher, load_small_student

__all__ = ['DiffusionLM', 'load_mdlm_small', 'load_small_student', 'load_scaling_student', 'load_scaling_teacher']
