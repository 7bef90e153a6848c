"""Evaluation: the judge classifier, fidelity/diversity metrics and memorisation checks.

    metrics       AUROC / F1 (numpy; checked against scikit-learn in the tests)
    features      named feature extractors pinned by a sha256 of their weights
    fidelity      FID, KID, precision/recall (k-NN manifolds), MS-SSIM diversity
    memorisation  nearest training image of each generated image, in feature and pixel space
    classifier    DenseNet-121-style multi-label classifier + training loop
    alignment     balanced prompt set -> generated images -> the judge's per-finding verdicts
    report        one HTML page from every evaluation output under a folder
    augment       the augmentation experiment: classifier on reference subsets with/without generated images

Submodules are imported on use (torch-heavy); `megamed eval ...` is the command line.
"""
