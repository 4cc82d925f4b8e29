"""Multi-resolution face data: VGGFace2 (the paper), embedded real faces (the default run), a
folder of your own faces, synthetic faces (tests)."""

from crossres.datamodules.base import MultiResolutionDataModule
from crossres.datamodules.cr_data import CrossResolutionDataModule, FaceAugmentation
from crossres.datamodules.embedded import EmbeddedFacesDataModule
from crossres.datamodules.folder import FolderFacesDataModule
from crossres.datamodules.resolution import ResolutionTransform, degrade
from crossres.datamodules.synthetic import SyntheticFacesDataModule
from crossres.datamodules.vggface2 import VGGFace2DataModule

__all__ = [
    "CrossResolutionDataModule",
    "FaceAugmentation",
    "EmbeddedFacesDataModule",
    "FolderFacesDataModule",
    "MultiResolutionDataModule",
    "ResolutionTransform",
    "SyntheticFacesDataModule",
    "VGGFace2DataModule",
    "degrade",
]
