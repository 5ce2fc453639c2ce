// The aedes broker (npm; in-memory persistence) on 127.0.0.1:PORT, for tests/brokers/.
// `node aedes_broker.js PORT`. .ci/run installs aedes beside it (`npm ci` in tests/brokers).
// aedes 0.51 (node >= 16, so Debian's nodejs does): its 1.x needs node >= 20.
// A client's subscriptions and QoS 1 queue survive its disconnects while this process runs.
'use strict'
const net = require('net')
const aedes = require('aedes')({ concurrency: 1000 })

const port = Number(process.argv[2])
aedes.on('clientError', (client, err) => console.error(`client ${client && client.id}: ${err.message}`))
const server = net.createServer(aedes.handle)
server.listen(port, '127.0.0.1', () => console.error(`aedes ${require('aedes/package.json').version} listening on 127.0.0.1:${port}`))
const stop = () => server.close(() => aedes.close(() => process.exit(0)))
process.on('SIGTERM', stop)
process.on('SIGINT', stop)
