// Parses DICOM objects written by sr_writers the way OHIF 3 does and prints JSON.
//
// usage: node parse_seg.mjs MANIFEST.json
//   MANIFEST = {"groups": [{"sources": [source series paths], "objects": [written object paths]}, ...]}
//   (one node start for many cases: cornerstone takes about a second to load)
//
// Every object is read with dcmjs (DicomMessage.readFile + naturalizeDataset). SEG objects
// (BINARY 66.4 and LABELMAP 66.7) are then decoded against the source series with
// @cornerstonejs/adapters Cornerstone3D.Segmentation.createFromDICOMSegBuffer, the loader OHIF's
// cornerstone-dicom-seg extension calls: it maps each SEG frame to a source image by its
// ReferencedSOPInstanceUID (+ frame number), falling back to ImagePositionPatient, and paints it
// into a per-source labelmap. We print, per source frame, the labelled pixel indices per segment.
import fs from "node:fs";
import dcmjs from "dcmjs";
import * as csCore from "@cornerstonejs/core";
import { adaptersSEG } from "@cornerstonejs/adapters";

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;
const SEG_CLASSES = new Set(["1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"]);
const SR_CLASSES = new Set(["1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.88.22",
  "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34"]);

function readDicom(path) {
  const buf = fs.readFileSync(path);
  const arrayBuffer = buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength);
  const dicom = DicomMessage.readFile(arrayBuffer);
  const dataset = DicomMetaDictionary.naturalizeDataset(dicom.dict);
  dataset._meta = DicomMetaDictionary.namifyDataset(dicom.meta);
  return { arrayBuffer, dataset, preamble: Array.from(buf.subarray(0, 128)).every((b) => b === 0) };
}

const asArray = (v) => (v === undefined ? [] : Array.isArray(v) ? v : [v]);
const first = (v) => asArray(v)[0];
const nums = (v) => asArray(v).map(Number);

// Cornerstone metadata modules for one source frame, as OHIF's metadata provider serves them.
function frameModules(ds, frameIndex) {
  let ipp = ds.ImagePositionPatient, iop = ds.ImageOrientationPatient, ps = ds.PixelSpacing;
  let thickness = ds.SliceThickness;
  if (ds.PerFrameFunctionalGroupsSequence) {
    const per = asArray(ds.PerFrameFunctionalGroupsSequence)[frameIndex] || {};
    const shared = first(ds.SharedFunctionalGroupsSequence) || {};
    const pick = (kw) => first(per[kw]) || first(shared[kw]) || {};
    ipp = pick("PlanePositionSequence").ImagePositionPatient;
    iop = pick("PlaneOrientationSequence").ImageOrientationPatient;
    ps = pick("PixelMeasuresSequence").PixelSpacing;
    thickness = pick("PixelMeasuresSequence").SliceThickness;
  }
  iop = nums(iop); ipp = nums(ipp); ps = nums(ps);
  const instance = { ...ds, ImagePositionPatient: ipp, ImageOrientationPatient: iop, PixelSpacing: ps };
  return {
    instance,
    generalSeriesModule: { seriesInstanceUID: ds.SeriesInstanceUID, modality: ds.Modality },
    generalImageModule: { sopInstanceUID: ds.SOPInstanceUID, instanceNumber: ds.InstanceNumber },
    sopCommonModule: { sopInstanceUID: ds.SOPInstanceUID, sopClassUID: ds.SOPClassUID },
    imagePixelModule: { rows: ds.Rows, columns: ds.Columns, bitsAllocated: ds.BitsAllocated,
      bitsStored: ds.BitsStored, highBit: ds.HighBit, pixelRepresentation: ds.PixelRepresentation,
      samplesPerPixel: 1, photometricInterpretation: ds.PhotometricInterpretation },
    imagePlaneModule: { frameOfReferenceUID: ds.FrameOfReferenceUID, rows: ds.Rows, columns: ds.Columns,
      imageOrientationPatient: iop, rowCosines: iop.slice(0, 3), columnCosines: iop.slice(3),
      imagePositionPatient: ipp, pixelSpacing: ps, rowPixelSpacing: ps[0], columnPixelSpacing: ps[1],
      sliceThickness: Number(thickness) },
  };
}

// imageIds in the order a viewer's display set holds them (as given; the adapter must not care).
function loadSources(paths, group, meta) {
  const imageIds = [];
  const keys = new Map();
  paths.forEach((path, n) => {
    const { dataset } = readDicom(path);
    const frames = Number(dataset.NumberOfFrames || 1);
    const multi = frames > 1 || dataset.PerFrameFunctionalGroupsSequence !== undefined;
    for (let f = 0; f < frames; f++) {
      const id = multi ? `dicomfile:g${group}/${n}?frame=${f + 1}` : `dicomfile:g${group}/${n}`;
      imageIds.push(id);
      meta.set(id, frameModules(dataset, f));
      keys.set(id, multi ? `${dataset.SOPInstanceUID}#${f + 1}` : dataset.SOPInstanceUID);
    }
  });
  return { meta, imageIds, keys };
}

function flattenContent(items, out, depth = 0) {
  for (const item of asArray(items)) {
    const name = first(item.ConceptNameCodeSequence)?.CodeMeaning;
    const entry = { depth, type: item.ValueType, name };
    if (item.TextValue !== undefined) entry.text = item.TextValue;
    if (item.UID !== undefined) entry.uid = item.UID;
    if (item.MeasuredValueSequence) entry.value = Number(first(item.MeasuredValueSequence).NumericValue);
    if (item.ConceptCodeSequence) entry.code = first(item.ConceptCodeSequence).CodeMeaning;
    if (item.ReferencedSOPSequence) {
      const ref = first(item.ReferencedSOPSequence);
      entry.ref = { uid: ref.ReferencedSOPInstanceUID, frames: asArray(ref.ReferencedFrameNumber).map(Number),
        segments: asArray(ref.ReferencedSegmentNumber).map(Number) };
    }
    out.push(entry);
    flattenContent(item.ContentSequence, out, depth + 1);
  }
  return out;
}

function metadataProvider(meta) {
  const provider = {
    get: (type, id) => meta.get(id)?.[type],
    add: (id, type, value) => {
      if (!meta.has(id)) meta.set(id, {});
      meta.get(id)[type] = value;
    },
  };
  // The adapter also creates derived labelmap images through cornerstone's own metadata registry.
  csCore.metaData.addProvider((type, id) => provider.get(type, id), 10000);
  return provider;
}

async function decodeSeg(arrayBuffer, sources, provider) {
  const result = await adaptersSEG.Cornerstone3D.Segmentation.createFromDICOMSegBuffer(
    sources.imageIds, arrayBuffer, { metadataProvider: provider });
  const frames = {};
  for (const layer of result.labelMapImages) {
    layer.forEach((image, i) => {
      const px = image.getPixelData();
      const key = sources.keys.get(sources.imageIds[i]);
      for (let j = 0; j < px.length; j++) {
        if (!px[j]) continue;
        frames[key] = frames[key] || {};
        (frames[key][px[j]] = frames[key][px[j]] || []).push(j);
      }
    });
  }
  const labels = {};
  result.segMetadata.data.forEach((d, i) => { if (d) labels[i] = d.SegmentLabel; });
  return { frames, labels, overlapping: Boolean(result.overlappingSegments) };
}

const manifest = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const meta = new Map();
const provider = metadataProvider(meta);
const report = {};
for (const [g, group] of manifest.groups.entries()) {
const sources = loadSources(group.sources || [], g, meta);
for (const path of group.objects) {
  const { arrayBuffer, dataset: ds, preamble } = readDicom(path);
  const entry = {
    sopClassUID: ds.SOPClassUID, modality: ds.Modality, seriesDescription: ds.SeriesDescription,
    specificCharacterSet: ds.SpecificCharacterSet, patientName: first(ds.PatientName)?.Alphabetic ?? ds.PatientName,
    studyInstanceUID: ds.StudyInstanceUID, manufacturer: ds.Manufacturer, syntheticData: ds.SyntheticData,
    zeroPreamble: preamble, transferSyntax: ds._meta.TransferSyntaxUID?.Value?.[0],
  };
  try {
    if (SEG_CLASSES.has(ds.SOPClassUID)) {
      entry.segmentationType = ds.SegmentationType;
      entry.referencedSeries = first(ds.ReferencedSeriesSequence)?.SeriesInstanceUID;
      entry.seg = await decodeSeg(arrayBuffer, sources, provider);
    } else if (SR_CLASSES.has(ds.SOPClassUID)) {
      entry.completionFlag = ds.CompletionFlag;
      entry.verificationFlag = ds.VerificationFlag;
      entry.content = flattenContent(ds.ContentSequence, []);
    } else {
      entry.rows = ds.Rows; entry.columns = ds.Columns; entry.photometric = ds.PhotometricInterpretation;
      entry.hasWindow = ds.WindowCenter !== undefined; entry.hasRescale = ds.RescaleSlope !== undefined;
    }
  } catch (err) {
    entry.error = String(err && err.message ? err.message : err);
  }
  report[path] = entry;
}
}
process.stdout.write(JSON.stringify(report));
// cornerstone keeps timers alive in some code paths; the result is out, so leave now.
process.exit(0);
