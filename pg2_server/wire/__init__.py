"""What both ends of a connection share, with no numpy, torch or OpenCV: the protocol, the client,
the COCO-18 keypoint names, image-format sniffing and CURVE key files.

The Blender add-on's build copies this folder whole into the extension (as `pg2_wire/`), so its
modules import only each other (relatively), pyzmq, msgpack and the standard library.
"""
