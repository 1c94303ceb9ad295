/**
 * OHIF v3 configuration served by pacs at /app-config.js on the viewer port
 * (it replaces the dist's own app-config.js, which points at a public demo server).
 *
 * DICOMweb is same-origin under /dicom-web: the viewer port serves the DICOMweb
 * application itself there, so the browser needs no CORS and sends nothing elsewhere.
 * Tested with @ohif/app 3.13.2 (see tests/interop/test_ohif.py).
 */
window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 3,
  showWarningMessageForCrossOrigin: true,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  // No "investigational use only" dialog on every start.
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'dicomweb',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'dicomweb',
      configuration: {
        friendlyName: 'pacs',
        name: 'pacs',
        // Relative roots: the same origin as the viewer.
        wadoUriRoot: '/dicom-web',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        // OHIF 3.13.2 sends includefield=a,b,c regardless; the adapter splits it.
        qidoSupportsIncludeField: true,
        imageRendering: 'wadors',
        // Thumbnails drawn from /frames, like the images (one decoding path to trust).
        thumbnailRendering: 'wadors',
        // Metadata per series (/studies/{study}/series/{series}/metadata).
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: true,
        supportsWildcard: true,
        // Unquoted Accept parameters: a "simple" request, no CORS preflight if ever
        // served cross-origin.
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true },
        // OHIF's delete (reject) action on a series: pacs turns it on with
        // PACS_WEB_DELETE=true (adapters/viewer/app.py), the node then serves it.
        supportsReject: false,
      },
    },
  ],
};
