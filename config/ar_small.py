# The autoregressive baseline of the paper: MDLM/SDTT's AR network (the DiT's embedding, rotary causal attention and
# MLPs in plain pre-LN blocks, no adaLN; 162.2M parameters at this size), next-token loss, trained like the MDLM
# (SPEC §2-3, §6). Its out_dir is also a local judge for generative perplexity.
# Data:  python prepare_data.py --out_dir=data/owt
# Run (from the repo root):   torchrun --standalone --nproc_per_node=8 distill.py config/ar_small.py
exec(open('config/mdlm_small.py').read())
objective = 'ar'
out_dir = 'out/ar_small'
