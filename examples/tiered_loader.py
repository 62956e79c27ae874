"""Load an ImageFolder through memstrata's tiered sample store (same samples and order as RandomSampler).

    python examples/tiered_loader.py              # about 20 s: writes 256 synthetic JPEGs first
"""

import tempfile

from memstrata.data import TieredLoader, TrainAugment, synth_imagefolder



def main() -> None:
    with tempfile.TemporaryDirectory() as root, tempfile.TemporaryDirectory() as store:
        synth_imagefolder(root, images=256, classes=4, seed=0, progress=False)  # an ImageNet-like folder of JPEGs
        loader = TieredLoader(root, batch_size=64, seed=0, epochs=2, augment=TrainAugment(size=96), num_workers=2,
                              store_dir=store, progress=False)
        for epoch in range(2):
            loader.set_epoch(epoch)
            n = 0
            for images, labels in loader:  # epoch 0 decodes into the store; epoch 1 reads it back
                n += len(labels)
            print(f"epoch {epoch}: {n} samples, batch {tuple(images.shape)} {images.dtype}")
        loader.close()


if __name__ == "__main__":  # the loader's decode workers are processes: guard the entry point
    main()
