# SDTT of the published MDLM small with the 'mse' divergence: the kld_small recipe otherwise (run from the repo root)
# Run:   torchrun --standalone --nproc_per_node=8 distill.py config/mse_small.py
exec(open('config/kld_small.py').read())
out_dir = 'out/mse_small'
divergence = 'mse'   # mean squared error of the LOG-probabilities (mean over positions x V)
