# SDTT of an MDLM medium (424.5M parameters) with the reverse KL, the kld_small recipe otherwise (SPEC §5).
# The teacher is yours to fill in (init_from below), one of:
#   - an MDLM trained with the original MDLM code: its Lightning checkpoint, e.g. .../checkpoints/0-1000000.ckpt
#     (n_head and block_size below must match it; see distill.py load_lightning_ckpt if torch.load refuses the file)
#   - an out_dir of this project: python distill.py config/mdlm_small.py --n_layer=24 --n_head=16 --n_embd=1024 --out_dir=out/mdlm_medium
#   - the scaling teacher of the SDTT release: init_from = 'jdeschena/sdtt', init_revision = 'teacher_400k_md_step_400000'
# Run (from the repo root):   torchrun --standalone --nproc_per_node=8 distill.py config/kld_medium.py
exec(open('config/kld_small.py').read())   # the recipe; what differs:
init_from = ''                          # FILL IN: the teacher (an empty value stops with an error)
n_head, block_size = 16, 1024           # only read for an MDLM .ckpt teacher (not stored in its weights)
out_dir = 'out/kld_medium'
