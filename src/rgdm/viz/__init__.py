"""rgdm.viz"""
