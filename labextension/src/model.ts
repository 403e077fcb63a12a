/**
 * The panel's state: the running clusters as last told, and the actions on them.
 */

import { ISignal, Signal } from '@lumino/signaling';

import { DistConnection } from './connection';
import { ClusterEvent, ICluster, IStartRequest } from './types';

/**
 * Where the panel's view of the server stands: not yet told anything, told
 * and following changes, or cut off (the clusters shown are as last seen).
 */
export type Liveness = 'connecting' | 'live' | 'lost';

export class DistModel {
  constructor(connection: DistConnection) {
    this._connection = connection;
    connection.events.connect(this._onEvent, this);
    connection.connectionChanged.connect(this._onConnection, this);
  }

  /** Emitted after any change of clusters, connection or error. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** The clusters, newest first. */
  get clusters(): ICluster[] {
    return [...this._clusters.values()].sort((a, b) => b.created - a.created);
  }

  /**
   * Live from the server's first snapshot on a websocket until that socket
   * closes; lost from then until a new socket brings a new snapshot.
   */
  get liveness(): Liveness {
    return this._liveness;
  }

  /** Whether the clusters are the server's current ones, so actions on them can work. */
  get isLive(): boolean {
    return this._liveness === 'live';
  }

  /** The last action's error message, or ''. */
  get error(): string {
    return this._error;
  }

  /** Whether an action is waiting for the server. */
  get isBusy(): boolean {
    return this._busy > 0;
  }

  get isDisposed(): boolean {
    return this._isDisposed;
  }

  dispose(): void {
    if (this._isDisposed) {
      return;
    }
    this._isDisposed = true;
    this._connection.events.disconnect(this._onEvent, this);
    this._connection.connectionChanged.disconnect(this._onConnection, this);
    Signal.clearData(this);
  }

  startCluster(request: IStartRequest): Promise<void> {
    return this._act(() => this._connection.startCluster(request));
  }

  stopCluster(clusterId: string): Promise<void> {
    return this._act(() => this._connection.stopCluster(clusterId));
  }

  restartEngine(clusterId: string, engineId: number): Promise<void> {
    return this._act(() => this._connection.restartEngine(clusterId, engineId));
  }

  private async _act(action: () => Promise<unknown>): Promise<void> {
    this._busy += 1;
    this._error = '';
    this._changed.emit();
    try {
      await action();
    } catch (reason) {
      this._error = reason instanceof Error ? reason.message : String(reason);
    } finally {
      this._busy -= 1;
      this._changed.emit();
    }
  }

  private _onEvent(sender: DistConnection, event: ClusterEvent): void {
    if (event.type === 'clusters') {
      this._clusters = new Map(event.clusters.map(c => [c.cluster_id, c]));
      this._liveness = 'live';
    } else if (event.type === 'cluster') {
      this._clusters.set(event.cluster.cluster_id, event.cluster);
    } else {
      this._clusters.delete(event.cluster_id);
    }
    this._changed.emit();
  }

  private _onConnection(sender: DistConnection, isConnected: boolean): void {
    // An open socket is not live yet: the server's snapshot, sent first, makes it so.
    if (!isConnected && this._liveness === 'live') {
      this._liveness = 'lost';
      this._changed.emit();
    }
  }

  private _connection: DistConnection;
  private _clusters = new Map<string, ICluster>();
  private _liveness: Liveness = 'connecting';
  private _error = '';
  private _busy = 0;
  private _isDisposed = false;
  private _changed = new Signal<this, void>(this);
}
