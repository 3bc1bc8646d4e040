# SDTT of the published MDLM small with the 'tvd' divergence: the kld_small recipe otherwise (run from the repo root)
# Run:   torchrun --standalone --nproc_per_node=8 distill.py config/tvd_small.py
exec(open('config/kld_small.py').read())
out_dir = 'out/tvd_small'
divergence = 'tvd'   # the reference's 'tvd': L1 distance of the LOG-probabilities summed over V ('tvd_true' is 0.5 sum |p_s - p_t|)
